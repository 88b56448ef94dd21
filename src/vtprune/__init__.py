"""vtprune: visual-token pruning for Hugging Face vision-language models, with debiased attention scores."""

__version__ = "0.1.0"

from .debias import Debias
from .methods import DART, METHODS, DivPrune, FasterVLM, FastV, HiMAP, ILLaVA, PyramidDrop, Random, SparseVLM, TokenCarve, VisionZip
from .press import Press
from .stages import Kept, Stage, StageSelection

__all__ = ["Debias", "FastV", "PyramidDrop", "HiMAP", "SparseVLM", "TokenCarve", "ILLaVA", "VisionZip", "FasterVLM", "DART", "DivPrune", "Random", "Press", "Stage", "StageSelection", "Kept", "METHODS", "__version__"]
