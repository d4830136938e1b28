"""Layer 2 (above core and models): uint8 image sets, the data set registry, BackdoorBench records
(which hold a model's weights, hence above models) and their safe unpickler."""
