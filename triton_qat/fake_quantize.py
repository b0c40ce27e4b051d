"""torch.ao's module name for the observers and fake-quant modules, kept for existing code.

`triton_qat.fake_quantize.FakeQuantize` and the rest are the classes of triton_qat.quantizers
(the same objects, so isinstance checks, pickled modules and qconfigs written against this
name keep working). New code imports from triton_qat.quantizers.
"""

from triton_qat.quantizers import *  # noqa: F403
from triton_qat.quantizers import __all__  # noqa: F401
