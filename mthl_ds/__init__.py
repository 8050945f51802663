"""mthl-ds: multi-task heterogeneous vision learners on DeepSpeed-MoE.

    import mthl_ds
    model = mthl_ds.load("model.safetensors")            # an export, a run folder or a checkpoint folder
    model.predict(["cat.jpg"], dataset="imagenet")

Importing the package imports nothing heavy (the command line answers ``--help`` without torch); modules that
import DeepSpeed first import ``mthl_ds.accelerator``.
"""


def load(path, **kwargs):
    """A :class:`mthl_ds.predict.Predictor` for an export file, a run folder or ``RUN/checkpoints/TAG``."""
    from mthl_ds.predict import Predictor
    return Predictor.load(path, **kwargs)
