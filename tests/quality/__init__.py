"""Quality benchmark helpers: a Fashion-MNIST classifier, an EfficientNet-Lite0 feature extractor and metrics."""
