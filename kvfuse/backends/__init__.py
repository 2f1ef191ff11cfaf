"""Backend registrations. Each module registers its implementations with `kvfuse.dispatch`."""
