"""xrdvision: crystal-system and space-group classification from powder XRD patterns.

The pipeline turns CIFs into simulated Cu K-alpha diffractograms (xrayutilities), renders them as
224x224 images and fine-tunes an ImageNet VGG16 on them; DVC versions the data, MLflow tracks runs.
"""

__version__ = "0.1.0"
