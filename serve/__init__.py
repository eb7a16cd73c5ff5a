"""The HTTP stage: an OpenAI-compatible server over the runtime's Scheduler. Imports the runtime,
never torch; nothing imports this package."""
