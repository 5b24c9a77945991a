
from tinymodels import ConvBn, TwoLinear, conv_input, linear_input


def pytest_trt_refit_models():
    return {"conv_bn": (ConvBn, conv_input(), {"examples": 4, "checks": ["weights"]}),
            "two_linear": (TwoLinear, linear_input(), {"examples": 4, "checks": ["weights"]})}
