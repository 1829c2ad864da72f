"""lora_rm: train LoRA reward models for RLHF on a single consumer GPU."""

from lora_rm.config import TrainConfig
from lora_rm.errors import UserError
from lora_rm.evaluation.reward_model import RewardModel, reward_function
from lora_rm.loss import pairwise_loss
from lora_rm.model.rewards import compute_rewards
from lora_rm.model.saved import load_reward_model
from lora_rm.training.loop import TrainingStopped, train
from lora_rm.training.outputs import TrainResult

__all__ = [
    "RewardModel",
    "TrainConfig",
    "TrainResult",
    "TrainingStopped",
    "UserError",
    "compute_rewards",
    "load_reward_model",
    "pairwise_loss",
    "reward_function",
    "train",
]
__version__ = "0.1.0"
