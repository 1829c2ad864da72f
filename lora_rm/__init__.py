"""lora_rm: train LoRA reward models for RLHF on a single consumer GPU."""

from lora_rm.config import TrainConfig
from lora_rm.errors import UserError
from lora_rm.fit import TrainingStopped
from lora_rm.loss import pairwise_loss
from lora_rm.rewards import compute_rewards
from lora_rm.rlhf import reward_function
from lora_rm.saved import load_reward_model
from lora_rm.score import RewardModel
from lora_rm.train import TrainResult, train

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
