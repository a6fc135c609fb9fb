"""Chat with tools: the workspace sandbox, the built-in tools, parsing the model's tool calls."""
