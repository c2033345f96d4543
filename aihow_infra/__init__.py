"""ai-how infrastructure as code: the library behind the Pulumi program and the tasks."""
