"""Crystallography and diffraction physics with no pipeline I/O.

Reading a structure, its symmetry labels, Bragg's law and X-ray wavelengths, structure factors and peak
lists, and peak profiles: pure functions the data stages, the models and prediction all build on.
"""
