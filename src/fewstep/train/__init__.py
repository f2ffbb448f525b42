"""The training loop (one for every method), EMA weights, atomic checkpoints and teacher training."""

from fewstep.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fewstep.train.ema import EMA, warmup_decay
from fewstep.train.teacher import TeacherConfig, TeacherTraining, train_teacher
from fewstep.train.trainer import TrainConfig, TrainResult, train

__all__ = [
    "EMA",
    "Checkpoint",
    "TeacherConfig",
    "TeacherTraining",
    "TrainConfig",
    "TrainResult",
    "load_checkpoint",
    "save_checkpoint",
    "train",
    "train_teacher",
    "warmup_decay",
]
