"""The kds conformance kit: reference MemoryStore, Hypothesis strategies and checks.

Third-party backends run the same suite as the built-in ones: build a
:class:`StoreFactory` for your store and call the checks in :mod:`kds.testing.checks`.
"""

from kds.testing.factory import StoreFactory as StoreFactory
from kds.testing.factory import StoreSpec as StoreSpec
from kds.testing.memory import MemoryStore as MemoryStore
