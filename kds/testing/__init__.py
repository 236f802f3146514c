"""The kds conformance kit: reference MemoryStore, Hypothesis strategies and checks.

Third-party backends run the same suite as the built-in ones: build a
:class:`StoreFactory` for your store and call the checks in :mod:`kds.testing.checks`.

* :mod:`kds.testing.strategies`: Hypothesis strategies for keys, specs, changes,
  batches and tracking cursors;
* :mod:`kds.testing.checks`: pytest-free ``check_*`` coroutines, one per promise
  of the Store contract;
* :mod:`kds.testing.stateful`: :class:`~kds.testing.stateful.StoreModel`, which
  compares a store with :class:`MemoryStore` under random operations;
* :mod:`kds.testing.crash`: a writer process to kill with SIGKILL, and the checks
  that the store it leaves behind lost, split and repeated no batch;
* :mod:`kds.testing.transport_checks`: the same for transports: a
  :class:`TransportFactory` per backend and pytest-free ``check_*`` coroutines,
  one per promise of the Transport contract.
"""

from kds.testing.factory import StoreFactory as StoreFactory
from kds.testing.factory import StoreSpec as StoreSpec
from kds.testing.kubeapi import KubeApiServer as KubeApiServer
from kds.testing.memory import MemoryStore as MemoryStore
from kds.testing.nats import NatsServer as NatsServer
from kds.testing.relay import TcpRelay as TcpRelay
from kds.testing.transport import MemorySession as MemorySession
from kds.testing.transport import MemoryTransport as MemoryTransport
from kds.testing.transport_checks import TransportFactory as TransportFactory
from kds.testing.transport_checks import TransportPair as TransportPair
