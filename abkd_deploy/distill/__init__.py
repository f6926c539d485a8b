"""Distillation: KD losses (registry), the trainer, teacher training, ``distill``."""

from abkd_deploy.distill.teacher import train_teacher
from abkd_deploy.distill.trainer import FitResult, TrainConfig, Trainer

__all__ = ["FitResult", "TrainConfig", "Trainer", "train_teacher"]
