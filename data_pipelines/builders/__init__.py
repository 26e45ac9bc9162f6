"""TFDS builders of the fundus datasets (importing this registers them).

Each name maps to (builder class, config class, config naming function).
"""

from data_pipelines.builders.common import BuildError
from data_pipelines.builders.fundus_assembly import AssemblyConfig, FundusAssembly
from data_pipelines.builders.fundus_classification import ClassificationConfig, FundusClassification
from data_pipelines.builders.fundus_synthetic import FundusSynthetic, SyntheticConfig
from data_pipelines.builders import fundus_assembly, fundus_classification, fundus_synthetic

BUILDERS = {
    'fundus_assembly': (FundusAssembly, AssemblyConfig, fundus_assembly.config_name),
    'fundus_synthetic': (FundusSynthetic, SyntheticConfig, fundus_synthetic.config_name),
    'fundus_classification': (FundusClassification, ClassificationConfig,
                              fundus_classification.config_name),
}
