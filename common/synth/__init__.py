"""Synthetic multi-site chest X-ray cohort: a test bed for the pipeline and the H1 protocol,
not evidence about real patients. See ``cohort.generate`` and ``fedcxr synth``."""

from common.synth.cohort import SynthOptions, generate

__all__ = ["SynthOptions", "generate"]
