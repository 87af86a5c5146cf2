"""What wraps an optimizer: the adaptive step (learning rate, momentum and
damping from the local quadratic model), gradient accumulation and TrainState."""
