"""The DVC data stages, in pipeline order: ingest, simulate, render (with augment), split, peaklists,
generate.

Each stage module holds a ``run_<stage>`` function that the CLI calls; the physics they use lives in
:mod:`xrdvision.crystal` and the file formats in :mod:`xrdvision.formats`.
"""
