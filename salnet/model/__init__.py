"""The saliency network: torchvision ResNet C2..C5 -> PPM -> FPN -> fused logit (+ side logits).

`python -m salnet.model --backbone resnet50 --size 352` prints parameters, GFLOPs and shapes.
`model.factory` puts a researcher's own network in its place (salnet/model/factory.py).
"""

from salnet.model.salnet import SalNet, build_model, side_logits_in_training
from salnet.model.weights import BackboneWeightsError

__all__ = ["SalNet", "build_model", "side_logits_in_training", "BackboneWeightsError"]
