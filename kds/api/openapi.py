"""The OpenAPI 3.1 document of the API, generated from the route table and the catalog.

Every type of the catalog gets its schema (flat or with ``spec``) and its list
schema; every route of the table becomes an operation. A custom type registered in
the catalog therefore appears in the document like the built-in ones.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

from kds.api.problems import TITLES
from kds.api.routes import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, path_parameters
from kds.resource import Scope

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from kds.api.routes import Route, Schema
    from kds.resource import Catalog, ResourceType

__all__ = ["document", "list_schema_name", "ref", "schema_name"]

_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")

_STRING: Final = {"type": "string"}
_TIME: Final = {"type": "string", "format": "date-time", "readOnly": True}
_LABELS: Final = {"type": "object", "additionalProperties": {"type": "string"}}
_PARAMETERS: Final = {
    "mesh": {"name": "mesh", "in": "path", "required": True, "schema": _STRING},
    "name": {"name": "name", "in": "path", "required": True, "schema": _STRING},
    "size": {
        "name": "size",
        "in": "query",
        "required": False,
        "description": "Items per page.",
        "schema": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_PAGE_SIZE,
            "default": DEFAULT_PAGE_SIZE,
        },
    },
    "offset": {
        "name": "offset",
        "in": "query",
        "required": False,
        "description": "Items to skip.",
        "schema": {"type": "integer", "minimum": 0, "default": 0},
    },
}
_COUNT: Final = {
    "type": "object",
    "properties": {"total": {"type": "integer", "minimum": 0}},
    "required": ["total"],
}


def schema_name(resource_type: ResourceType | str) -> str:
    """The component name of a type's schema (its name, made safe for a JSON pointer)."""
    name = resource_type if isinstance(resource_type, str) else resource_type.name
    return _UNSAFE.sub("_", name)


def list_schema_name(resource_type: ResourceType | str) -> str:
    """The component name of a type's list schema."""
    return schema_name(resource_type) + "List"


def ref(name: str) -> dict[str, str]:
    """A reference to the component schema *name*."""
    return {"$ref": f"#/components/schemas/{name}"}


def document(
    routes: Iterable[Route], catalog: Catalog, *, version: str, mode: str
) -> dict[str, Any]:
    """Build the OpenAPI 3.1 document of *routes*.

    Args:
        routes: what the server serves.
        catalog: the resource types, for their schemas.
        version: the server's version, as the document's ``info.version``.
        mode: ``global`` or ``zone``, named in the description.
    """
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operations = paths.setdefault(route.path, {})
        operations[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kds control plane API",
            "version": version,
            "description": (
                f"The HTTP API of a kds {mode} control plane. Reads are open; writes from "
                "clients other than loopback need `Authorization: Bearer <admin token>`."
            ),
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": _schemas(catalog),
            "parameters": _PARAMETERS,
            "responses": {
                str(status): {
                    "description": title,
                    "content": {"application/json": {"schema": ref("Error")}},
                }
                for status, title in sorted(TITLES.items())
            },
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "The control plane's admin token (`<workDir>/admin-token`); "
                        "needed for writes from clients other than loopback."
                    ),
                }
            },
        },
    }


def _operation(route: Route) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"$ref": f"#/components/parameters/{name}"} for name in path_parameters(route.path)
    ]
    if route.paged:
        parameters += [
            {"$ref": "#/components/parameters/size"},
            {"$ref": "#/components/parameters/offset"},
        ]
    responses: dict[str, Any] = {
        str(status): {
            "description": description,
            "content": {route.media_type: {"schema": dict(schema)}},
        }
        for status, (description, schema) in sorted(route.responses.items())
    }
    for status in sorted({*route.errors, 500}):
        responses[str(status)] = {"$ref": f"#/components/responses/{status}"}
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
        "responses": responses,
    }
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": dict(route.body)}},
        }
    if route.write:
        # Optional: loopback clients need no token.
        operation["security"] = [{}, {"adminToken": []}]
    return operation


def _schemas(catalog: Catalog) -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "properties": {
                "type": {"const": "/std-errors"},
                "status": {"type": "integer"},
                "title": _STRING,
                "detail": _STRING,
                "invalid_parameters": {"type": "array", "items": ref("InvalidParameter")},
            },
            "required": ["type", "status", "title", "detail", "invalid_parameters"],
        },
        "InvalidParameter": {
            "type": "object",
            "properties": {
                "field": {
                    "type": "string",
                    "description": 'The field: `name`, `spec.mtls`, `labels["kuma.io/origin"]`.',
                },
                "reason": _STRING,
            },
            "required": ["field", "reason"],
        },
        "PutResult": {
            "type": "object",
            "properties": {"warnings": {"type": "array", "items": _STRING}},
            "required": ["warnings"],
        },
        "DeleteResult": {"type": "object", "maxProperties": 0},
        "Index": {
            "type": "object",
            "properties": {
                "product": {"const": "kds"},
                "version": _STRING,
                "instanceId": _STRING,
                "mode": {"enum": ["global", "zone"]},
                "zone": {"type": ["string", "null"]},
                "clusterId": {"type": "string", "description": "The store's epoch."},
            },
            "required": ["product", "version", "instanceId", "mode", "zone", "clusterId"],
        },
        "ResourceTypes": {
            "type": "object",
            "properties": {
                "resources": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": _STRING,
                            "path": _STRING,
                            "scope": {"enum": ["Mesh", "Global"]},
                            "readOnly": {"type": "boolean"},
                            "flatSpec": {"type": "boolean"},
                        },
                        "required": ["name", "path", "scope", "readOnly", "flatSpec"],
                    },
                }
            },
            "required": ["resources"],
        },
        "ZoneOverview": _overview(
            "ZoneOverview",
            {
                "zone": {
                    "type": "object",
                    "properties": {"enabled": {"type": "boolean"}},
                    "required": ["enabled"],
                },
                "zoneInsight": {
                    "type": "object",
                    "properties": {
                        "subscriptions": {"type": "array", "items": ref("Subscription")}
                    },
                    "required": ["subscriptions"],
                },
            },
        ),
        "Subscription": {
            "type": "object",
            "description": "One replication session of the zone, as its ZoneInsight keeps it.",
            "properties": {
                "id": _STRING,
                "globalInstanceId": _STRING,
                "zoneInstanceId": _STRING,
                "version": _STRING,
                "backend": _STRING,
                "connectTime": {"type": "string", "format": "date-time"},
                "disconnectTime": {"type": ["string", "null"], "format": "date-time"},
                "lastSeen": {"type": "string", "format": "date-time"},
                "status": {"type": "object"},
            },
        },
        "ZoneIngressOverview": _overview(
            "ZoneIngressOverview",
            {"zoneIngress": {"type": "object"}, "zoneIngressInsight": {"type": "object"}},
        ),
        "ZoneEgressOverview": _overview(
            "ZoneEgressOverview",
            {"zoneEgress": {"type": "object"}, "zoneEgressInsight": {"type": "object"}},
        ),
        "ZoneStatuses": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": _STRING, "active": {"type": "boolean"}},
                "required": ["name", "active"],
            },
        },
        "GlobalInsight": {
            "type": "object",
            "properties": {
                "type": {"const": "GlobalInsight"},
                "createdAt": {"type": "string", "format": "date-time"},
                "zones": {
                    "type": "object",
                    "properties": {
                        "controlPlanes": {
                            "type": "object",
                            "properties": {
                                "total": {"type": "integer"},
                                "online": {"type": "integer"},
                            },
                            "required": ["total", "online"],
                        },
                        "zoneIngresses": _COUNT,
                        "zoneEgresses": _COUNT,
                    },
                },
                "meshes": {
                    "type": "object",
                    "properties": {
                        "total": {"type": "integer"},
                        "withoutMtlsAcrossZones": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "Meshes with dataplanes in several zones but no "
                            "mTLS: cross-zone traffic needs mTLS.",
                        },
                    },
                    "required": ["total", "withoutMtlsAcrossZones"],
                },
                "resources": {"type": "object", "additionalProperties": _COUNT},
            },
            "required": ["type", "createdAt", "zones", "meshes", "resources"],
        },
        "Configuration": {
            "type": "object",
            "description": "The effective configuration, secrets masked.",
        },
        "Ready": {
            "type": "object",
            "properties": {"status": {"const": "ready"}},
            "required": ["status"],
        },
    }
    for name in ("ZoneOverview", "ZoneIngressOverview", "ZoneEgressOverview"):
        schemas[name + "List"] = _list_of(ref(name))
    for resource_type in catalog:
        schemas[schema_name(resource_type)] = _resource_schema(resource_type)
        schemas[list_schema_name(resource_type)] = _list_of(ref(schema_name(resource_type)))
    return schemas


def _overview(type_name: str, properties: Mapping[str, Schema]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "type": {"const": type_name},
            "name": _STRING,
            "creationTime": _TIME,
            "modificationTime": _TIME,
            **properties,
            "online": {"type": "boolean"},
        },
        "required": ["type", "name", *properties, "online"],
    }


def _list_of(item: Schema) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "total": {"type": "integer", "minimum": 0},
            "items": {"type": "array", "items": dict(item)},
            "next": {"type": ["string", "null"], "description": "The next page's URL."},
        },
        "required": ["total", "items", "next"],
    }


def _resource_schema(resource_type: ResourceType) -> dict[str, Any]:
    properties: dict[str, Any] = {"type": {"const": resource_type.name}}
    required = ["type", "name"]
    if resource_type.scope is Scope.MESH:
        properties["mesh"] = _STRING
    properties["name"] = _STRING
    properties["labels"] = _LABELS
    properties["creationTime"] = _TIME
    properties["modificationTime"] = _TIME
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if resource_type.flat_spec:
        schema["description"] = (
            f"A {resource_type.name}: its spec's fields sit beside type and name."
        )
        schema["additionalProperties"] = True
    else:
        schema["description"] = f"A {resource_type.name}: its spec's fields are under spec."
        properties["spec"] = {"type": "object"}
        schema["additionalProperties"] = False
    return schema
