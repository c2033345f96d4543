"""Where the project keeps what it knows between tasks (``layout``), and nothing else: the
writers of each record live with what they record (power, runs, deploys, leases)."""
