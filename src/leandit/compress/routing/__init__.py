"""DiffCR (DiffRatio-MoD, arXiv 2412.16822): token routing with learned, differentiable kept
ratios per block and timestep region on a pretrained diffusion transformer, fine-tuned toward
a compression target, frozen to a static capacity schedule for inference."""

from .block import RouteGroup, RoutePlan, RoutedBlock
from .macs import RoutedMacs
from .model import RoutedModel, RoutingSettings
from .saving import build_saved, saved_state
from ...models.wrappers import WrapperType, register_wrapper

register_wrapper(WrapperType(name="diffcr", cls=RoutedModel, inner=lambda w: w.inner, state=saved_state, build=build_saved))

__all__ = ["RouteGroup", "RoutePlan", "RoutedBlock", "RoutedMacs", "RoutedModel", "RoutingSettings"]
