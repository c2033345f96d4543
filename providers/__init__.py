"""Pulumi dynamic providers written with libvirt-python, and the GPU lease ledger.

Provider modules are imported by the ``pulumi.dynamic`` provider process (the
provider objects are pickled by reference), so they must stay free of side
effects at import time.
"""
