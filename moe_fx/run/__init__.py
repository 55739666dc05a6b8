"""Running a whole prune: recipes (a method name and a budget -> passes), the streamed driver that prunes one
decoder layer at a time, and sweeps over methods and ratios."""
