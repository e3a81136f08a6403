"""beliefstore: an event-sourced store of what AI agents believe about the people they serve."""
