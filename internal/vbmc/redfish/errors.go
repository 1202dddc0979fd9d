package redfish

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Message ids come from DMTF's Base message registry.
const baseRegistry = "Base.1.19."

// message is one entry of a Redfish error's @Message.ExtendedInfo.
type message struct {
	id         string // without the registry prefix, e.g. "PropertyUnknown"
	text       string
	args       []string
	property   string // JSON pointer of the property at fault, e.g. "#/Boot/BootSourceOverrideTarget"
	resolution string
}

func msgPropertyUnknown(pointer, name string) message {
	return message{id: "PropertyUnknown", property: pointer, args: []string{name},
		text:       fmt.Sprintf("The property %s is not in the list of valid properties for the resource.", name),
		resolution: "Remove the unknown property from the request body and resubmit the request if the operation failed."}
}

func msgPropertyNotWritable(pointer, name string) message {
	return message{id: "PropertyNotWritable", property: pointer, args: []string{name},
		text:       fmt.Sprintf("The property %s is a read only property and cannot be assigned a value.", name),
		resolution: "Remove the property from the request body and resubmit the request if the operation failed."}
}

func msgValueNotInList(pointer, name, value string) message {
	return message{id: "PropertyValueNotInList", property: pointer, args: []string{value, name},
		text:       fmt.Sprintf("The value '%s' for the property %s is not in the list of acceptable values.", value, name),
		resolution: "Choose a value from the enumeration list that the implementation can support and resubmit the request if the operation failed."}
}

func msgValueTypeError(pointer, name, value string) message {
	return message{id: "PropertyValueTypeError", property: pointer, args: []string{value, name},
		text:       fmt.Sprintf("The value '%s' for the property %s is not a type that the property can accept.", value, name),
		resolution: "Correct the value for the property in the request body and resubmit the request if the operation failed."}
}

func msgMalformedJSON() message {
	return message{id: "MalformedJSON",
		text:       "The request body submitted was malformed JSON and could not be parsed by the receiving service.",
		resolution: "Ensure that the request body is valid JSON and resubmit the request."}
}

func msgPropertyMissing(name string) message {
	return message{id: "PropertyMissing", property: "#/" + name, args: []string{name},
		text:       fmt.Sprintf("The property %s is a required property and must be included in the request.", name),
		resolution: "Ensure that the property is in the request body and has a valid value and resubmit the request if the operation failed."}
}

func msgActionParameterMissing(action, param string) message {
	return message{id: "ActionParameterMissing", property: "#/" + param, args: []string{action, param},
		text:       fmt.Sprintf("The action %s requires the parameter %s to be present in the request body.", action, param),
		resolution: "Supply the action with the required parameter in the request body when the request is resubmitted."}
}

func msgActionParameterUnknown(action, param string) message {
	return message{id: "ActionParameterUnknown", property: "#/" + param, args: []string{action, param},
		text:       fmt.Sprintf("The action %s was submitted with the invalid parameter %s.", action, param),
		resolution: "Correct the invalid parameter and resubmit the request if the operation failed."}
}

func msgActionParameterValueNotInList(action, param, value string) message {
	return message{id: "ActionParameterValueNotInList", property: "#/" + param, args: []string{value, param, action},
		text:       fmt.Sprintf("The value '%s' for the parameter %s in the action %s is not in the list of acceptable values.", value, param, action),
		resolution: "Choose a value from the enumeration list that the implementation can support and resubmit the request if the operation failed."}
}

func msgActionParameterValueTypeError(action, param, value string) message {
	return message{id: "ActionParameterValueTypeError", property: "#/" + param, args: []string{value, param, action},
		text:       fmt.Sprintf("The value '%s' for the parameter %s in the action %s is not a type that the parameter can accept.", value, param, action),
		resolution: "Correct the value for the parameter in the request body and resubmit the request if the operation failed."}
}

func msgActionParameterValueFormatError(action, param, value string) message {
	return message{id: "ActionParameterValueFormatError", property: "#/" + param, args: []string{value, param, action},
		text:       fmt.Sprintf("The value '%s' for the parameter %s in the action %s is not a format that the parameter can accept.", value, param, action),
		resolution: "Correct the value for the parameter in the request body and resubmit the request if the operation failed."}
}

func msgActionNotSupported(action string) message {
	return message{id: "ActionNotSupported", args: []string{action},
		text:       fmt.Sprintf("The action %s is not supported by the resource.", action),
		resolution: "The action supplied cannot be resubmitted to the implementation.  Perhaps the action was invalid, the wrong resource was the target or the implementation documentation may be of assistance."}
}

func msgOperationNotAllowed(why string) message {
	return message{id: "OperationNotAllowed",
		text:       "The HTTP method is not allowed in the current state of the resource: " + why + ".",
		resolution: "None."}
}

func msgResourceInUse(why string) message {
	return message{id: "ResourceInUse",
		text:       "The change to the requested resource failed because the resource is in use or in transition: " + why + ".",
		resolution: "Remove the condition and resubmit the request if the operation failed."}
}

func msgResourceMissing(uri string) message {
	return message{id: "ResourceMissingAtURI", args: []string{uri},
		text:       fmt.Sprintf("The resource at the URI %s was not found.", uri),
		resolution: "Place a valid resource at the URI or correct the URI and resubmit the request."}
}

func msgNoValidSession() message {
	return message{id: "NoValidSession",
		text:       "There is no valid session established with the implementation.",
		resolution: "Establish a session before attempting any operations."}
}

func msgUnauthorized(uri string) message {
	return message{id: "ResourceAtUriUnauthorized", args: []string{uri, "invalid credentials"},
		text:       fmt.Sprintf("While accessing the resource at %s, the service received an authorization error: invalid credentials.", uri),
		resolution: "Ensure that the appropriate access is provided for the service in order for it to access the URI."}
}

func msgSessionLimitExceeded() message {
	return message{id: "SessionLimitExceeded",
		text:       "The session establishment failed due to the number of simultaneous sessions exceeding the limit of the implementation.",
		resolution: "Reduce the number of other sessions before trying to establish the session or increase the limit of simultaneous sessions, if supported."}
}

func msgMethodNotAllowed(method string) message {
	return message{id: "OperationNotAllowed",
		text:       fmt.Sprintf("The HTTP method %s is not allowed on this resource.", method),
		resolution: "None."}
}

func msgPreconditionFailed() message {
	return message{id: "PreconditionFailed",
		text:       "The ETag supplied did not match the ETag required to change this resource.",
		resolution: "Try the operation again using the appropriate ETag."}
}

func msgUnavailable(retrySeconds string) message {
	return message{id: "ServiceTemporarilyUnavailable", args: []string{retrySeconds},
		text:       "The service is temporarily unavailable.",
		resolution: "Wait for the indicated retry duration and retry the operation."}
}

func msgInternalError() message {
	return message{id: "InternalError",
		text:       "The request failed due to an internal service error.  The service is still operational.",
		resolution: "Resubmit the request.  If the problem persists, consider resetting the service."}
}

// writeError sends a Redfish error response. With one message, its id is the
// error code; with several, the code is GeneralError and each is listed.
func writeError(w http.ResponseWriter, status int, msgs ...message) {
	code := baseRegistry + "GeneralError"
	text := "A general error has occurred. See Resolution for information on how to resolve the error."
	if len(msgs) == 1 {
		code, text = baseRegistry+msgs[0].id, msgs[0].text
	}
	info := make([]any, 0, len(msgs))
	for _, m := range msgs {
		entry := map[string]any{
			"@odata.type":     "#Message.v1_1_1.Message",
			"MessageId":       baseRegistry + m.id,
			"Message":         m.text,
			"MessageArgs":     nonNil(m.args),
			"MessageSeverity": "Warning",
			"Severity":        "Warning",
			"Resolution":      m.resolution,
		}
		if m.property != "" {
			entry["RelatedProperties"] = []string{m.property}
		}
		info = append(info, entry)
	}
	body, _ := encodeJSON(map[string]any{"error": map[string]any{
		"code": code, "message": text, "@Message.ExtendedInfo": info,
	}})
	writeJSON(w, status, body)
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func writeJSON(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body) //nolint:gosec // JSON built by encodeJSON and sent as application/json, not HTML

}

// retryAfter renders a duration as a Retry-After value: whole seconds, rounded up, at least 1.
func retryAfter(d time.Duration) string {
	return strconv.FormatInt(max(1, int64((d+time.Second-1)/time.Second)), 10)
}

// quoteValue renders a JSON value for an error message.
func quoteValue(raw []byte) string { return strings.Trim(string(raw), `"`) }
