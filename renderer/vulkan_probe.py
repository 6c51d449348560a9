"""List the machine's Vulkan physical devices through the Vulkan loader (ctypes, no extra dependency).

Taichi does not say which device its Vulkan backend picked. ``auto`` needs to know, because a software
driver (Mesa's lavapipe, "llvmpipe") is Vulkan on the CPU and slower than Taichi's own x64 backend.

>>> [d.name for d in vulkan_devices()]   # doctest: +SKIP
['llvmpipe (LLVM 15.0.6, 256 bits)']
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

# VkPhysicalDeviceType
DEVICE_TYPES = {0: "other", 1: "integrated GPU", 2: "discrete GPU", 3: "virtual GPU", 4: "CPU"}
_VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO = 1
_VK_SUCCESS = 0


@dataclass(frozen=True)
class VulkanDevice:
    """One Vulkan physical device: its name and kind ("discrete GPU", "CPU", ...)."""

    name: str
    kind: str

    @property
    def is_software(self) -> bool:
        return self.kind == "CPU"


class _InstanceCreateInfo(ctypes.Structure):
    _fields_ = [
        ("sType", ctypes.c_uint32),
        ("pNext", ctypes.c_void_p),
        ("flags", ctypes.c_uint32),
        ("pApplicationInfo", ctypes.c_void_p),
        ("enabledLayerCount", ctypes.c_uint32),
        ("ppEnabledLayerNames", ctypes.c_void_p),
        ("enabledExtensionCount", ctypes.c_uint32),
        ("ppEnabledExtensionNames", ctypes.c_void_p),
    ]


def vulkan_devices() -> list[VulkanDevice]:
    """The Vulkan physical devices the loader reports; empty when there is no loader or no driver."""
    names = [ctypes.util.find_library("vulkan"), "libvulkan.so.1", "libvulkan.1.dylib", "vulkan-1.dll"]
    lib = None
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return []
    info = _InstanceCreateInfo(sType=_VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO)
    instance = ctypes.c_void_p()
    if lib.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(instance)) != _VK_SUCCESS:
        return []
    try:
        count = ctypes.c_uint32(0)
        lib.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), None)
        handles = (ctypes.c_void_p * count.value)()
        lib.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), handles)
        devices = []
        for handle in handles[: count.value]:
            # VkPhysicalDeviceProperties: 4 uint32 (api, driver, vendor, device ids), deviceType at byte 16,
            # deviceName[256] at byte 20; the rest (limits, sparse properties) fits well inside 4 KiB.
            props = ctypes.create_string_buffer(4096)
            lib.vkGetPhysicalDeviceProperties(ctypes.c_void_p(handle), props)
            kind = DEVICE_TYPES.get(int.from_bytes(props.raw[16:20], "little"), "other")
            name = props.raw[20:276].split(b"\0", 1)[0].decode(errors="replace")
            devices.append(VulkanDevice(name=name, kind=kind))
        return devices
    finally:
        lib.vkDestroyInstance(instance, None)
