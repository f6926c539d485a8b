"""Datasets (registry + loaders) and graph formats (CSR, ELL blocks, samplers)."""

from abkd_deploy.data.registry import DATASETS, check_data, load_dataset, parse_dataset_name

__all__ = ["DATASETS", "check_data", "load_dataset", "parse_dataset_name"]
