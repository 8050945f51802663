"""mthl-ds: multi-task heterogeneous vision learners on DeepSpeed-MoE.

    import mthl_ds
    model = mthl_ds.load("model.safetensors")            # an export, a run folder or a checkpoint folder
    model.predict(["cat.jpg"], dataset="imagenet")
    mthl_ds.load("model.safetensors", device="cuda:1", precision="bf16")   # on a chosen device, under autocast

Importing the package imports nothing heavy (the command line answers ``--help`` without torch); modules that
import DeepSpeed first import ``mthl_ds.runtime.accelerator``.
"""


def load(path, device=None, precision=None):
    """A :class:`mthl_ds.predict.Predictor` for an export file, a run folder or ``RUN/checkpoints/TAG``, loaded
    onto the CPU and moved to ``device`` (``cpu``, ``cuda``, ``cuda:N``; default: CUDA where there is one, else the
    CPU); ``precision``: None / ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 is refused on the CPU)."""
    from mthl_ds.predict import Predictor
    return Predictor.load(path, device=device, precision=precision)
