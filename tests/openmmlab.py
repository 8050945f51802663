"""mmdet 3.3.0 and mmsegmentation 1.2.2 as test oracles (the ``oracle`` extra): their RetinaNet and UperNet
parts built from the config files their packages ship, with the parts of mmcv they need.

mmcv-lite is mmcv without its compiled ops, and ``mmcv.ops`` loads them (``mmcv._ext``) when imported. The
stand-in module here gives the one op these parts call, ``nms``, as torchvision's (mmcv's with ``offset=0``:
the same boxes kept, in the same order); any other op raises. It lives in the tests, never in the package."""
import sys
import types
from pathlib import Path

import torch
import torchvision

OPENMMLAB = ("mmdet", "mmseg", "mmengine", "mmcv")


def mmcv_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    if offset != 0:
        raise NotImplementedError("the stand-in for mmcv's nms takes offset 0 only (mmdet's default)")
    return torchvision.ops.nms(boxes, scores, iou_threshold)


def stand_in_ops() -> None:
    """Register the stand-in ``mmcv._ext`` (once) before mmcv.ops is imported."""
    if "mmcv._ext" in sys.modules:
        return
    ext = types.ModuleType("mmcv._ext")
    ext.nms = mmcv_nms

    def missing(name):
        if name.startswith("__"):  # module attributes (__file__, ...) that tools such as inspect look for
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise NotImplementedError(f"mmcv op {name} is not in the tests' stand-in for mmcv's compiled ops")
        return op
    ext.__getattr__ = missing
    sys.modules["mmcv._ext"] = ext


def config(package: str, relative: str):
    """A config file as the package ships it (``<package>/.mim/configs/...``), read by mmengine."""
    from mmengine.config import Config
    module = __import__(package)
    return Config.fromfile(str(Path(module.__file__).parent / ".mim" / "configs" / relative))


def retinanet_swin_t():
    """mmdet's ``retinanet_swin-t-p4-w7_fpn_1x_coco`` config."""
    stand_in_ops()
    return config("mmdet", "swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py")


def upernet_swin_t():
    """mmseg's ``swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512`` config."""
    stand_in_ops()
    return config("mmseg", "swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py")


def build(registry_package: str, cfg):
    """A module from a config dict through ``registry_package``'s MODELS registry (all its modules registered)."""
    stand_in_ops()
    if registry_package == "mmdet":
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    return MODELS.build(cfg)


stand_in_ops()  # before any test imports mmdet's or mmseg's modules
