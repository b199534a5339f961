"""Using a trained model: sampling, block-state decoding, parameter export and loading."""

from bst_dist.generate.decode import Decoder, generate, stream
from bst_dist.generate.sampling import SamplingError, check_sampling, sample

__all__ = ["Decoder", "generate", "stream", "sample", "check_sampling", "SamplingError"]
