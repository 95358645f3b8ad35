"""Real servers on 127.0.0.1 that tests point real client libraries at."""
