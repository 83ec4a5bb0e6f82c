def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: spawns gloo process groups (tests/distributed)")
