"""Ray service: GPU worker actors, session router, job queue, Serve app."""
