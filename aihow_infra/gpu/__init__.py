"""GPUs shared between stacks: the lease ledger every stack consults (``ledger``) and the
operator's reads of it, stale leases and reclaiming one (``leases``).

The GpuLease provider (providers/gpu_lease.py) acquires; the domain provider releases the lease of
a VM that did not start. ``libvirt/`` imports nothing from here.
"""
