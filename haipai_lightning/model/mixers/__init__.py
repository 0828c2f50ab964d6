from haipai_lightning.model.mixers.adaptive_span import AdaptiveSpanAttention
from haipai_lightning.model.mixers.attention import Attention
from haipai_lightning.model.mixers.cca import CoreContextAttention
from haipai_lightning.model.mixers.cope import CoPEAttention
from haipai_lightning.model.mixers.dtrnet import DTRNetAttention
from haipai_lightning.model.mixers.mamba import Mamba
from haipai_lightning.model.mixers.mindskip import MindSkipAttention
from haipai_lightning.model.mixers.moh import MixtureOfHeadsAttention

__all__ = ["AdaptiveSpanAttention", "Attention", "CoPEAttention", "CoreContextAttention", "DTRNetAttention", "Mamba",
           "MindSkipAttention", "MixtureOfHeadsAttention"]
