"""The vocabulary shared by the capture and the optimizers: how a layer's
parameters are read as matrices (views), the statistics of a layer, and how
layers are found in a parameter tree."""
