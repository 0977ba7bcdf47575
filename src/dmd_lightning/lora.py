"""LoRA (Hu et al. 2022) on a denoiser's UNet: a generator (or fake score) trained as low-rank adapters on a frozen
copy of the teacher, as DMD2's SDXL LoRA generator (tianweiy/DMD2, main/sd_unified_model.py with --generator_lora).

Each adapted layer W x becomes W x + (alpha / rank) B A x, with B = 0 at the start: a LoRA generator begins as
exactly the teacher's one-step output, as a full copy does. The adapters are peft's (`inject_adapter_in_model`),
which takes any torch module: diffusers' own `add_adapter` exists on UNet2DConditionModel but not on UNet2DModel.
Use it in a config as

    generator:
      class_path: dmd_lightning.generator.OneStepGenerator
      init_args:
        denoiser:
          class_path: dmd_lightning.lora.LoRADenoiser
          init_args: {denoiser: {class_path: dmd_lightning.sd.model.SDDenoiser, init_args: {path: ...}}}
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from dmd_lightning.denoisers import Denoiser

# DMD2's list (main/sd_unified_model.py): every linear and convolution inside the UNet's blocks, not only the
# attention that style LoRAs adapt: distillation changes what every block computes (from denoising at one t to
# generating from pure noise). Names are suffixes of module names; those a UNet lacks are skipped.
TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0",  # attention projections: both UNets (UNet2DModel's AttnDownBlock2D too)
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",  # transformer blocks: UNet2DConditionModel only
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",  # ResNet blocks: both
    "downsamplers.0.conv", "upsamplers.0.conv",  # resampling convolutions: both
)  # left as they are: conv_in, conv_out, the time and class embeddings and the norms (as DMD2)


class LoRADenoiser(Denoiser):
    """`denoiser` (built on a diffusers UNet, `.unet`) with its weights frozen and LoRA adapters on `target_modules`:
    only the adapters train. Defaults rank 64, alpha 8 (scale alpha / rank = 1/8) are DMD2's SDXL LoRA recipe
    (main/train_sd.py: --lora_rank 64 --lora_alpha 8 --lora_dropout 0; its generator lr there is 5e-5, 100x the
    full model's 5e-7). Everything else (unet, schedule, null_cond, text_conditional, path) is the wrapped
    denoiser's, so the rest of the project sees an ordinary denoiser."""

    def __init__(self, denoiser: Denoiser, rank: int = 64, alpha: float = 8.0,
                 target_modules: list[str] | None = None):
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__()
        self.denoiser = denoiser.requires_grad_(False)
        self.lora_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules or TARGET_MODULES))
        inject_adapter_in_model(self.lora_config, denoiser.unet)  # in place; the adapters alone require grad

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        return self.denoiser(x_t, t, cond)

    def predict(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        return self.denoiser.predict(x_t, t, cond)

    def null_cond(self, cond):
        return self.denoiser.null_cond(cond)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("denoiser")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)

    def lora_state_dict(self) -> dict[str, Tensor]:
        """The adapters' weights alone, in peft's naming (`....to_q.lora_A.weight`): a few MB at SD1.5 scale."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet)

    def load_lora_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load `lora_state_dict()` of a LoRADenoiser with the same base, rank and targets; every adapter must match."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.unet, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(f"not this LoRA: unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")


def is_lora(net: nn.Module) -> bool:
    """Whether `net` holds peft adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in net.modules())


def merged(net: nn.Module) -> nn.Module:
    """A copy of `net` with every adapter added into its base weight (W + alpha / rank B A) and the adapter layers
    replaced by their base layers: the plain network, with the state-dict keys of the network before LoRA."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, module.get_base_layer())
    net.__dict__.pop("peft_config", None)
    return net
