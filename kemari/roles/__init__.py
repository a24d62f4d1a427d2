"""The agent and its roles: one active or one standby at a time, and the changes between them."""
