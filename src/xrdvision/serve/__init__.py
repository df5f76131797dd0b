"""Using a trained model on a scientist's files: loading it, preparing inputs, predicting, measured scans."""
