"""Application code on top of the library: the ``sae-hooks`` command line, the demo and the embedded
default model. Nothing in the library imports from here."""
