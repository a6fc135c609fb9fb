"""Chat: the turn loop, its params and context, prompts, the tools and their sandbox, tool-call
parsing."""
