"""matplotlib with its backend chosen once for the package: Agg, which writes PNG files and needs no display
(training nodes and CI have none). Modules that plot import ``plt`` from here."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt"]
