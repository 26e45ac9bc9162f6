"""What machine a benchmark ran on: CPU model, cores, RAM."""

import os
import platform
import subprocess


def cpu_model() -> str:
  """``lscpu``'s model name, else the platform's processor string."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return platform.processor() or 'unknown CPU'
  for line in out.splitlines():
    if line.startswith('Model name:'):
      return line.split(':', 1)[1].strip()
  return platform.processor() or 'unknown CPU'


def ram_gib() -> float:
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
  except (ValueError, OSError):
    return float('nan')


def describe() -> str:
  return f'{cpu_model()}, {os.cpu_count()} cores, {ram_gib():.1f} GiB RAM'
