"""The classifier: model builders, the feature cache, training, evaluation and hyper-parameter tuning."""
