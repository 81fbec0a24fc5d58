"""Platform adapters: each translates one chat platform's events into DialogueService calls."""
