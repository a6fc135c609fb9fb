"""Running a model: phases, the generation loop, the compiled step, prefix caches, sampling."""
