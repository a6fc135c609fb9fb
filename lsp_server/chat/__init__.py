"""Chat: the turn loop, its params and context, prompts, tools and their sandbox."""
