"""The saliency network: torchvision ResNet C2..C5 -> PPM -> FPN -> fused logit (+ side logits).

`python -m salnet.model --backbone resnet50 --size 352` prints parameters, GFLOPs and shapes.
"""

from salnet.model.salnet import SalNet, build_model
from salnet.model.weights import BackboneWeightsError

__all__ = ["SalNet", "build_model", "BackboneWeightsError"]
