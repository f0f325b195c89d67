"""Pretraining models on the fused ops: MixMIM (-B/-L/-H), UM-MAE Swin and SimMIM (Swin / SwinV2)."""
from .mixmim import MixMIM, mixmim_base, mixmim_huge, mixmim_large, mixmim_tiny

__all__ = ["MixMIM", "mixmim_tiny", "mixmim_base", "mixmim_large", "mixmim_huge"]
from .ummae import UMMAESwin, ummae_swin_large, ummae_swin_tiny, ummae_swin_tiny_test  # noqa: E402

__all__ += ["UMMAESwin", "ummae_swin_tiny_test", "ummae_swin_tiny", "ummae_swin_large"]
from .training import MODEL_NAMES, TrainingStep, make_training_step  # noqa: E402

__all__ += ["make_training_step", "TrainingStep", "MODEL_NAMES"]
from .simmim import SimMIM, simmim_swin_base, simmim_swin_tiny_test, simmim_swinv2_base, simmim_swinv2_tiny_test  # noqa: E402

__all__ += ["SimMIM", "simmim_swin_tiny_test", "simmim_swinv2_tiny_test", "simmim_swin_base", "simmim_swinv2_base"]
