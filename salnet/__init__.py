"""salnet: distributed multi-GPU training for salient object detection.

The package is organised by pipeline stage; `salnet.train` wires the stages together in order.
Importing the package itself stays cheap (no torch) so that config errors surface in well
under a second.
"""

__version__ = "0.1.0"
